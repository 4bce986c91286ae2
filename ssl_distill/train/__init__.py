"""ssl_distill.train"""
