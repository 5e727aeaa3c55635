"""erofs"""
