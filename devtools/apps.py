from django.apps import AppConfig


class DevtoolsConfig(AppConfig):
    """What stands in for the outside world in the demo and the tests (the VMA simulator, the dev NBD
    layout and supervisor, the demo wiring). Never imported by a product app."""

    name = "devtools"
    verbose_name = "Development stand-ins"
