"""Extensions written the way a user adds one: each module is one file whose decorator (or
``register_*`` call) is its one registration. ``tests/test_extension.py`` imports them with
the registries restored afterwards, so no other test sees them."""
