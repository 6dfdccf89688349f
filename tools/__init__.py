"""Leaf utilities (numpy, OpenCV, PIL; never torch): boxes, images, drawing, artifacts, ShapesWorld."""
