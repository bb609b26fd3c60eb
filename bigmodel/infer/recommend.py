"""`bigmodel serve` for a recommender run (objectives sasrec, bert4rec): POST /recommend.

    POST /recommend  {"history": ["50", "181", "258"]}  or  {"histories": [[...], [...]]},
                     and optionally "top_k" (default RecsysConfig.top_k)
      200 -> {"recommendations": [{"items": [{"item", "title", "score"}, ..],
                                   "unknown_items": [..]}, ..]}   (one per history, in order)

Item ids are those of the data file (strings; numbers are read as their decimal text). Unknown
ids are named in "unknown_items" and the rest still answer; a history with no known item gets
{"error": ...} in its place. A bad request (invalid JSON, a missing or mistyped field, a value
out of range, an unknown field, too many histories) gets 400 and {"error": "<what is wrong and
how to fix it>"}, as /generate.
"""

from __future__ import annotations

import json

from bigmodel.infer.serve import RequestError, _int, json_object

EXAMPLE = '{"history": ["50", "181", "258"], "top_k": 10}'
FIELDS = ("history", "histories", "top_k")
MAX_HISTORY = 10_000


def _ids(v, name: str) -> list[str]:
  if not isinstance(v, list) or not v:
    raise RequestError(f'"{name}" must be a non-empty list of item ids, e.g. {EXAMPLE}')
  if len(v) > MAX_HISTORY:
    raise RequestError(f'"{name}" has {len(v)} items; at most {MAX_HISTORY}')
  for x in v:
    if isinstance(x, bool) or not isinstance(x, (str, int)):
      raise RequestError(f'"{name}": item ids are strings or integers, got {json.dumps(x)}')
  return [str(x) for x in v]


def parse_recommend(body: bytes, max_batch: int, max_k: int, default_k: int) -> dict:
  """A /recommend body -> {"histories": [[id, ..], ..], "top_k"}."""
  req = json_object(body, EXAMPLE, FIELDS)
  if ("history" in req) == ("histories" in req):
    raise RequestError(f'give exactly one of "history" (a list of item ids, oldest first) or '
                       f'"histories" (a list of such lists), e.g. {EXAMPLE}')
  if "history" in req:
    histories = [_ids(req["history"], "history")]
  else:
    hs = req["histories"]
    if not isinstance(hs, list) or not hs:
      raise RequestError('"histories" must be a non-empty list of lists of item ids')
    if len(hs) > max_batch:
      raise RequestError(f"{len(hs)} histories: at most {max_batch} a request (split them, or "
                         f"start the server with a larger --max_batch)")
    histories = [_ids(h, f"histories[{i}]") for i, h in enumerate(hs)]
  return {"histories": histories, "top_k": _int(req, "top_k", min(default_k, max_k), 1, max_k)}


def make_app(recommender, *, max_batch: int = 8, api_key: str | None = None,
             model_name: str = "bigmodel"):
  """The FastAPI app of a restored recommender (bigmodel.evaluation.recsys.Recommender)."""
  from bigmodel.infer import api
  return api.make_recommend_app(recommender, max_batch=max_batch, api_key=api_key,
                                model_name=model_name)
