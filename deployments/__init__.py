"""Ray Serve deployments: the only package that imports Ray."""

from deployments.config import AppConfig, DeploymentOptions

__all__ = ["AppConfig", "DeploymentOptions", "build_app"]


def __getattr__(name: str):
    # build_app imports ray.serve; keep `import deployments` (and its config) light.
    if name == "build_app":
        from deployments.app import build_app

        return build_app
    raise AttributeError(name)
