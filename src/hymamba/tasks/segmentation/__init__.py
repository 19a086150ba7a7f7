"""Semantic segmentation task pieces: ``metrics`` (a confusion matrix over a whole data set giving
mmseg's mIoU, aAcc, mAcc and per-class IoU / accuracy, summed over processes) and ``inference``
(mmseg's whole-image and sliding-window inference, with optional flip and multi-scale averaging).

Import the submodules themselves; this package imports nothing so that loading it stays cheap.
"""
