from django.contrib import admin
from django.http import HttpRequest

from .auth import ThrottledAdminAuthenticationForm
from .models import LoginEvent

# /admin/login/ is throttled like the portal's own login page.
admin.site.login_form = ThrottledAdminAuthenticationForm


@admin.register(LoginEvent)
class LoginEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "username", "address"]
    list_filter = ["kind"]
    search_fields = ["username", "address"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LoginEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: LoginEvent | None = None) -> bool:
        return False
