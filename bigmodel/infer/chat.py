"""`bigmodel chat`: a conversation with a decoder, one user turn a line of stdin.

The prompt is the whole conversation, rebuilt each turn (token ids, so past replies are
the exact tokens the model wrote):

    [system + "\\n"]  template(user 1) reply 1 SEP  template(user 2) reply 2 SEP ..  template(user n)

template is the run's PromptedConfig.prompt_template for a prompted-LM (SFT) run, where SEP is
EOS, the token that ended every response in training; otherwise "User: {prompt}\\nAssistant:"
with SEP a newline. A reply ends at EOS, at max_new_tokens, or where the model starts the
next user turn (the template's text before {prompt}, e.g. "User:"; cut after generation).
When the prompt plus max_new_tokens would pass ModelConfig.max_len, the oldest turns go
first; a single message still too long keeps its end.

stdout gets the replies, one after each turn; stderr the notes. `/reset` forgets the history,
`/quit` (or the end of stdin) ends. It reads stdin line by line, so a pipe works as well as a
terminal. The KV cache is rebuilt from the prompt each turn (a prefill), not kept across turns.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

from bigmodel.infer import decode

PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def resolve_template(exp, template: str = "") -> tuple[str, bool]:
  """(template, whether it is the run's SFT template); a given template must hold {prompt}."""
  if template:
    if "{prompt}" not in template:
      raise ValueError(f"--template {template!r} has no {{prompt}} placeholder; e.g. "
                       f"'User: {{prompt}}\\nAssistant:'")
    return template, False
  if exp.train.objective == "prompted_lm":
    return exp.task.prompt_template, True
  return PLAIN_TEMPLATE, False


def stop_text(template: str) -> str:
  """Where a reply ends if the model goes on to write the next user turn."""
  return template.split("{prompt}")[0].strip()


@dataclasses.dataclass
class Conversation:
  """The history and how it becomes a prompt of at most `limit - max_new_tokens` tokens."""
  tokenizer: object
  template: str
  limit: int
  max_new_tokens: int
  separator: list[int]
  system: str = ""
  turns: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: a reply needs at least 1 token")
    if self.max_new_tokens >= self.limit:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                       f"the model's {self.limit} positions: use fewer new tokens")

  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def _user(self, text: str) -> list[int]:
    return self._encode(self.template.replace("{prompt}", text))

  def prompt(self, user: str) -> tuple[list[int], int, bool]:
    """(prompt ids, turns dropped from the start, whether the message itself was cut)."""
    budget = self.limit - self.max_new_tokens
    head = self._encode(self.system + "\n") if self.system else []
    past = [self._user(u) + r + self.separator for u, r in self.turns]
    now = self._user(user)
    dropped = 0
    while past and len(head) + sum(map(len, past)) + len(now) > budget:
      past.pop(0)
      dropped += 1
    ids = head + [t for turn in past for t in turn] + now
    if len(ids) <= budget:
      return ids, dropped, False
    return ids[len(ids) - budget:], dropped, True

  def add(self, user: str, reply_ids: list[int]) -> None:
    self.turns.append((user, list(reply_ids)))

  def reset(self) -> None:
    self.turns.clear()


def cut_reply(tokenizer, ids: list[int], stop: str) -> tuple[str, list[int]]:
  """(reply text, its ids) up to where the model starts the next user turn (a token that
  straddles that point goes too)."""
  text = tokenizer.decode(ids)
  at = text.find(stop) if stop else -1
  if at < 0:
    return text.strip(), ids
  keep = list(ids)
  while keep and len(tokenizer.decode(keep)) > at:
    keep.pop()
  return text[:at].strip(), keep


def run(gen: decode.Generator, tokenizer, conv: Conversation, *, temperature: float = 0.7,
        top_k: int = 0, top_p: float = 1.0, seed: int = 0, stdin: TextIO | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
  """The read-reply loop; returns the number of replies."""
  stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
  tty = stdin.isatty()
  stop = stop_text(conv.template)
  eos = getattr(tokenizer, "eos_id", None)
  if tty:
    print("bigmodel chat: /reset forgets the conversation, /quit ends it", file=stderr, flush=True)
  replies = 0
  while True:
    if tty:
      print("> ", end="", file=stderr, flush=True)
    line = stdin.readline()
    if not line:
      break
    user = line.strip()
    if not user:
      continue
    if user == "/quit":
      break
    if user == "/reset":
      conv.reset()
      print("(conversation reset)", file=stderr, flush=True)
      continue
    if user.startswith("/"):
      print(f"(unknown command {user.split()[0]}: /reset or /quit)", file=stderr, flush=True)
      continue
    try:
      ids, dropped, cut = conv.prompt(user)
    except ValueError as e:       # a character the tokenizer does not know
      print(f"(cannot encode that message: {e})", file=stderr, flush=True)
      continue
    if dropped:
      print(f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit ModelConfig.max_len="
            f"{conv.limit})", file=stderr, flush=True)
    if cut:
      print(f"(the message was cut to its last {len(ids)} tokens)", file=stderr, flush=True)
    res = gen([ids], conv.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed + replies, eos_id=eos, max_len=conv.limit)[0]
    text, reply_ids = cut_reply(tokenizer, res.tokens, stop)
    conv.add(user, reply_ids)
    print(text, file=stdout, flush=True)
    replies += 1
  return replies
