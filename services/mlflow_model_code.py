"""The pyfunc model's code, logged as source (MLflow's models-from-code): loading it runs this file,
so no pickled object is ever stored in or read from the registry."""

from mlflow.models import set_model

from services.mlflow_model import DikiBundleModel

set_model(DikiBundleModel())
