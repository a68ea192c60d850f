"""Fixed quantities of the MGSV-EC data that the loaders, the metrics, the extractor and the flags share.

This module imports nothing: utils/train/options.py and utils/train/preflight.py read it while they
parse and check the flags, before torch (utils/data/features.py) or numpy is loaded.
"""

# Every track is cut or zero-padded to this many seconds; the detector's (centre, width) spans and
# the training targets are fractions of it (not of the track's own length), as in the original.
MAX_M_DURATION = 240.0

# Feature folders under --frozen_feature_path: the video features, and the music features of each
# window hop (--stride, seconds). Any other stride has no folder.
VIDEO_DIR = "vit_feature1"
MUSIC_DIRS: dict[float, str] = {2.5: "ast_feature2p5", 5.0: "ast_feature5",
                                7.5: "ast_feature7p5", 10.0: "ast_feature10"}
