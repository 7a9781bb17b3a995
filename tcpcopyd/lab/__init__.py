"""The namespace lab: client, online and target hosts on one machine."""
