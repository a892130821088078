pytest_plugins = ["tests.storage_fixtures", "tests.trainer_fixtures", "tests.image_fixtures", "tests.kube_fixtures", "tests.operator_helpers"]
