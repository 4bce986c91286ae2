"""ssl_distill.launch"""
