"""Ego-centric actions: the ego digit's displacement per frame, from the generator's truth or by
tracking it in the frames."""
