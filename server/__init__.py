"""skyclass.server"""
