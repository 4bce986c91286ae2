"""ssl_distill.hub"""
