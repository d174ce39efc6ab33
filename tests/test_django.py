"""A Django project as `django-admin startproject` makes it, served through `hotswap init
--app site_.wsgi:application`, with a view reading a table loaded at import: swapped under
load with 0 failed requests, and a release that fails to import rolled back (real uWSGI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from app_util import InitProject
from test_sockets import swaps_under_load

django = pytest.importorskip("django",
                            reason="Django is in the test extra: pip install -e .[test]")

TERMS = 2000
VIEWS = '''\
"""A view reading a table loaded at import: in the uWSGI master, before the workers fork
(srv.ini's smoke check asks /item/k1, so the URLconf and this module import there)."""
import json
from pathlib import Path

from django.http import JsonResponse

VERSION = "@VERSION@"
TABLE = json.loads((Path(__file__).parent / "table.json").read_text())
if len(TABLE) != @TERMS@:
    raise RuntimeError(f"table incomplete: {len(TABLE)} entries")
BROKEN_ITEM = @BROKEN@


def item(request, key):
    if key not in TABLE:
        return JsonResponse({"error": f"no {key}"}, status=404)
    return JsonResponse({"k": key, "v": TABLE[key], "version": VERSION})
'''.replace("@TERMS@", str(TERMS))
URLS = '''
from . import views  # noqa: E402 (added below startproject's own)

urlpatterns += [path("item/<str:key>", views.item)]
'''


class DjangoProject(InitProject):
    """`django-admin startproject site_`, a view, then `hotswap init`: nothing else."""

    def __init__(self, root: Path) -> None:
        made = subprocess.run([sys.executable, "-m", "django", "startproject", "site_",
                               str(root)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        package = root / "site_"
        (package / "table.json").write_text(json.dumps({f"k{i}": i for i in range(TERMS)}))
        (package / "urls.py").write_text((package / "urls.py").read_text() + URLS)
        settings = package / "settings.py"
        settings.write_text(settings.read_text().replace("DEBUG = True", "DEBUG = False")
                            .replace("ALLOWED_HOSTS = []", 'ALLOWED_HOSTS = ["*"]'))
        paths = ("/healthz", *(f"/item/k{i}" for i in range(40)))
        super().__init__(root, VIEWS, "site_/views.py", "site_.wsgi:application", paths)
        text = self.ini.read_text()
        assert "hotswap-smoke = GET /healthz -> 200" in text
        self.ini.write_text(text.replace("hotswap-smoke = GET /healthz -> 200",
                                         "hotswap-smoke = GET /healthz -> 200 | "
                                         "GET /item/k1 -> 200"))


@pytest.mark.slow
def test_a_startproject_site_swaps_under_load(tmp_path: Path):
    project = DjangoProject(tmp_path)
    try:
        project.start()
        swaps_under_load(project, str(project.socket))
        serving = project.health()
        project.release_app("broken", append='raise RuntimeError("this release is broken")\n')
        done = project.cli("reload")
        assert done.returncode == 1, done.stderr
        assert "RuntimeError: this release is broken" in done.stderr
        assert project.health()["master_pid"] == serving["master_pid"]
    finally:
        project.teardown()
