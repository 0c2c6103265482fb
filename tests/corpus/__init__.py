"""Generated broken inputs for the robustness and kill tests (see make_corpus.py)."""
