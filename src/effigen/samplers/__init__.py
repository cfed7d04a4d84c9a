from .guidance import guided_evaluations, guided_prediction
from .ode import SOLVERS, euler_sample, heun_sample, make_time_grid, number_of_evaluations

__all__ = ["SOLVERS", "euler_sample", "heun_sample", "guided_evaluations", "guided_prediction", "make_time_grid", "number_of_evaluations"]
