from zoo_fixture import tiny_zoo  # noqa: F401  (session fixture shared by tests/zoo and tests/eval)
