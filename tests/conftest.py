pytest_plugins = ["tests.storage_fixtures", "tests.trainer_fixtures"]
