"""skyclass.recordings"""
