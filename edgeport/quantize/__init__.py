"""INT8 machinery shared by the backends, written once: activation ranges (one class per method).
"""
