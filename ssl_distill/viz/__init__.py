"""ssl_distill.viz"""
