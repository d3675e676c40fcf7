"""Toy recipe text for spine tests (see toy_method.py)."""

TOY = """\
# athanor submit toy.yaml --wait
name: toy-demo
method: toy
teacher:
  config: {width: 8, hidden: 16}
student:
  hidden: 4
data:
  batch_size: 16
train:
  max_steps: 30
  lr: 0.01
  log_every_n_steps: 5
registry:
  name: toy-student
"""


def write_toy(tmp_path, text: str = TOY, name: str = "toy.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path
