"""blob"""
