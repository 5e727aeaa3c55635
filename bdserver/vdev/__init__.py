"""vdev"""
