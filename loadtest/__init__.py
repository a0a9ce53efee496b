"""skyclass.loadtest"""
