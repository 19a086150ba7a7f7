"""Applications: functions that return data (the command line prints it).

``validate`` (top-k on a data set), ``predict`` (classes of image files), ``export`` (ONNX, checked
in ONNX Runtime), ``benchmark`` (side-by-side speed), ``flops`` (multiply-add counting).
"""
