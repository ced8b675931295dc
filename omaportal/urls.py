from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.urls import path

from exports import views as export_views
from migrations_app import failover_views, node_views
from migrations_app import views as migration_views
from omaportal.web.auth import OmaLoginView

urlpatterns = [
    path("", migration_views.dashboard, name="dashboard"),
    path("vms/", migration_views.inventory, name="inventory"),
    path("vms/migrate/", migration_views.migrate_vms, name="migrate-vms"),
    path("vms/refresh/", migration_views.refresh_inventory, name="refresh-inventory"),
    path("vms/<str:vm_id>/failover/", failover_views.vm_failover, name="vm-failover"),
    path("vms/<str:vm_id>/failover/start/", failover_views.vm_failover_start, name="vm-failover-start"),
    path("vms/<str:vm_id>/failover/end/", failover_views.vm_failover_end, name="vm-failover-end"),
    path("failover/", failover_views.failover_mappings, name="failover-mappings"),
    path("groups/", migration_views.group_list, name="group-list"),
    path("groups/new/", migration_views.group_edit, name="group-new"),
    path("groups/<int:pk>/", migration_views.group_detail, name="group-detail"),
    path("groups/<int:pk>/edit/", migration_views.group_edit, name="group-edit"),
    path("jobs/", migration_views.job_list, name="job-list"),
    path("jobs/<str:job_id>/", migration_views.job_detail, name="job-detail"),
    path("jobs/<str:job_id>/cancel/", migration_views.job_cancel, name="job-cancel"),
    path("jobs/<str:job_id>/retry/", migration_views.job_retry, name="job-retry"),
    path("nodes/", node_views.node_list, name="node-list"),
    path("nodes/<str:name>/drain/", node_views.node_drain, name="node-drain"),
    path("nodes/<str:name>/undrain/", node_views.node_undrain, name="node-undrain"),
    path("exports/", export_views.mapping_list, name="mapping-list"),
    path("nbd/", export_views.nbd_server, name="nbd-server"),
    path("healthz", export_views.healthz, name="healthz"),
    path("metrics", migration_views.metrics, name="metrics"),
    path("login/", OmaLoginView.as_view(), name="login"),
    path("logout/", LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]
