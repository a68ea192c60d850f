"""Ground new short videos against a music library: the Python API behind
scripts/build_music_index.py and scripts/ground.py.

    gm = load_model("RUN/pytorch_model.bin.best_r1")          # weights + config + fingerprint
    build_index(gm, "tracks.csv", "features/Kuai_feature", "music.index")
    library = open_index("music.index", gm)                    # refuses an index of other weights
    feat, mask = load_video("clip.pt")
    result = ground(gm, library, feat, mask, topk=10)[0]       # top tracks, each with its moment

Why an index. Encoding a track (projection + temporal transformer) and its X-Pool keys/values
costs much more than scoring a query against it, and a library changes rarely; so the library
is encoded once into a folder of .npy arrays that are memory-mapped at query time (a 100k-track
library does not have to fit in RAM, only the chunk being scored).

What a query returns, and why it equals test.py. The retrieval score of a (video, track) pair
is `model.score_videos` on the stored output of `model.index_music` -- the test-time MsG score
of test.py (dual + single similarity for the paper's --vmr_loss), built in the same track order
and blocks as test.py builds it for the same tracks. The moment of each returned track is the
detector on that (video, track) pair, converted with model.spans.top_moment/spans_to_seconds
and clipped with utils.evaluate.metrics.clip_moments, i.e. exactly test.py's SmG prediction when the
track is the ground truth. A CSV's repeated ids (an MGSV-EC split lists a track once per video)
are one track, in first-occurrence order, which is how test.py orders the columns of its score
matrix; ties are broken by that order. A text file or list that repeats an id is refused.


Usage history (optional). Built with a prior CSV (normally the training split), the index also
stores each track's canonical clip there: the start most of its videos take, and how many
videos use the track (utils/evaluate/track_prior.py). Each returned track then carries that clip,
trimmed to the query's length, beside the model's moment: where the model would cut, and where
others cut this track. Tracks without history carry none.

Track durations (for clipping and plots) come from the CSV's music_total_duration when given;
otherwise from the mask: number of valid snippets x stride (an estimate: a window centre every
`stride` seconds is valid while centre <= duration, so it can be off by up to one stride).


The pieces, in the order a query meets them: model.py (checkpoint -> GroundingModel),
queries.py (music id lists, video features), index.py (building an index), library.py
(opening and checking one), search.py (scoring, shortlists, the detector), grounding.py
(ground(): one batch of queries end to end), report.py (table and plot); page.py is the
browser page of scripts/app.py, render.py writes its previews, bench.py the benchmark.
"""
from utils.ground.model import GroundingError, GroundingModel, load_model  # noqa: E402
from utils.ground.queries import Queries, load_query_csv, load_video, prepare_video, read_music_ids  # noqa: E402
from utils.ground.library import MusicLibrary, check_index_matches, open_index  # noqa: E402
from utils.ground.index import build_index, read_usage, write_index  # noqa: E402
from utils.ground.grounding import GroundTruth, QueryResult, TrackHit, ground  # noqa: E402
from utils.ground.report import format_results, plot_result  # noqa: E402

__all__ = ["GroundTruth", "GroundingError", "GroundingModel", "MusicLibrary", "Queries", "QueryResult", "TrackHit",
           "build_index", "check_index_matches", "format_results", "ground", "load_model", "load_query_csv",
           "load_video", "open_index", "plot_result", "prepare_video", "read_music_ids", "read_usage", "write_index"]
