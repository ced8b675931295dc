from django.contrib import admin
from django.urls import path

from exports import views

urlpatterns = [
    path("", views.overview, name="overview"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
