"""What ``examples/demo.py`` and the notebook run on: a small model trained in minutes on a CPU
(``model.demo_model``) and a small multimodal corpus with its queries (``corpus``)."""
