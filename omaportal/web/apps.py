from django.apps import AppConfig


class WebConfig(AppConfig):
    name = "omaportal.web"
    label = "web"
    verbose_name = "Web interface"
