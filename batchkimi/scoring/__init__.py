"""A pass over an output after its run, never inside the request path: values extracted from
answers (``extract``), scored against the expected ones (``score``), or graded by a model
(``grader``, a resumable run of its own).

May import: ``execution`` (the grader runs a job) and every layer below.
"""
