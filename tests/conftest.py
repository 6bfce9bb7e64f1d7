pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.kafka",
    "tests.fixtures.dbt",
]
