import numpy as np
import pytest

from clframe import metrics

# Worked by hand:
#   A = [[90,  -,  -],
#        [70, 80,  -],
#        [60, 75, 85]]
A = np.array([[90.0, np.nan, np.nan], [70.0, 80.0, np.nan], [60.0, 75.0, 85.0]])


def test_average_accuracy():
    assert metrics.average_accuracy(A, 0) == 90.0
    assert metrics.average_accuracy(A, 1) == 75.0
    assert metrics.average_accuracy(A, 2) == pytest.approx((60 + 75 + 85) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    assert metrics.forgetting(A, 0) == 0.0
    assert metrics.forgetting(A, 1) == 20.0  # task 0: 90 -> 70
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 75 = 5 -> mean 17.5
    assert metrics.forgetting(A, 2) == 17.5


def test_forgetting_max_covers_rows_up_to_previous_task():
    # Task 0 improves after task 1 (backward transfer), then drops: max is the later 95.
    B = np.array([[80.0, np.nan, np.nan], [95.0, 70.0, np.nan], [85.0, 70.0, 60.0]])
    assert metrics.forgetting(B, 2) == pytest.approx(((95 - 85) + (70 - 70)) / 2)


def test_bwt_against_diagonal():
    assert metrics.backward_transfer(A, 0) == 0.0
    assert metrics.backward_transfer(A, 1) == -20.0
    assert metrics.backward_transfer(A, 2) == pytest.approx(((60 - 90) + (75 - 80)) / 2)


def test_matrix_csv_layout():
    text = metrics.matrix_csv(A, 2)
    assert text.splitlines() == ["after_task,task_0,task_1,task_2", "0,90.0000,,", "1,70.0000,80.0000,"]
