"""skyclass.media"""
