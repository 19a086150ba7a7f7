"""Object detection and instance segmentation: metrics (COCO evaluation of torchvision's detector
outputs with pycocotools' ``COCOeval``, box and mask AP, gathered over processes) in ``metrics``; the
configuration and the engine task arrive in their own modules. This package imports nothing, so that
loading it stays cheap; import the submodules themselves.
"""
