"""Dataset manifests and the face preparation that training and evaluation share (not the serving path)."""
