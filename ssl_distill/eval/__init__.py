"""ssl_distill.eval"""
