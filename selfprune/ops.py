"""Operations helpers for deployments (see ``prefect.yaml``) and for setting up a Prefect server.

:func:`run_directory` is the deployments' pull step. The flow code itself comes from the
*installed* ``selfprune`` package (the entrypoints are module paths, ``selfprune.flows.…``), so
nothing is downloaded or read from a checkout; the step only gives a flow run a working
directory that outlives it: ``$SELFPRUNE_HOME`` (default ``~/.cache/selfprune``), where the
deployments' relative ``out`` directories (``runs/…``) are written. Without it a process
worker runs each flow in a temporary directory that is deleted when the run ends.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfprune.storage.paths import home


def run_directory() -> dict[str, str]:
    """Pull step: change to ``$SELFPRUNE_HOME`` (created if missing) and report it to Prefect."""
    directory = str(home().resolve())
    os.chdir(directory)
    return {"directory": directory}



def env_from_secrets(**secrets: str) -> dict[str, str]:
    """Pull step: set each environment variable to the value of the Prefect Secret block named.

    ``selfprune.ops.env_from_secrets: {OPENAI_API_KEY: openai-api-key}`` reads the block when the
    flow run starts, in the flow-run process, so the key is stored nowhere but in the block. A
    ``{{ prefect.blocks.secret.openai-api-key }}`` placeholder would not do: in ``job_variables``
    ``prefect deploy`` resolves it and stores the key in plain text in the deployment (shown
    under Configuration in the UI), and anywhere in a deployment ``prefect deploy`` needs the
    block to exist already.
    """
    from prefect.blocks.system import Secret

    from selfprune.core.errors import UserError

    for variable, block in secrets.items():
        try:
            value = Secret.load(block).get()
        except ValueError as exc:
            raise UserError(f"the Secret block {block!r} for {variable} is missing ({exc}). Fix: create it, e.g. "
                            f"python -c 'from prefect.blocks.system import Secret; "
                            f"Secret(value=\"...\").save(\"{block}\")'") from None
        os.environ[variable] = str(value)
    return {}


def install_automation(path: Path) -> str:
    """Create the automation in ``path`` (a ``prefect automation create --from-file`` YAML) on the
    configured server, or update the one of the same name: safe to run again. Returns what it did."""
    import yaml
    from prefect.automations import Automation

    from selfprune.core.errors import UserError

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the automation file {path} ({exc}); run this from the selfprune repository, "
                        "or pass --automation PATH") from None
    automation = Automation.model_validate(spec)
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:
        automation.create()
        return f"created automation {automation.name!r}"
    automation.id = existing.id
    automation.update()
    return f"updated automation {automation.name!r}"


def ensure_work_pool(name: str) -> str:
    """The process work pool ``name``, created unless it exists. Returns what it did."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    pool = WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(pool)
        except ObjectAlreadyExists:
            return f"work pool {name!r} exists"
    return f"created work pool {name!r}"
