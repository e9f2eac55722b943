"""Datasets (CoOp layout, image folders, COCO captions), few-shot sampling, base/new splits, datamodules."""
