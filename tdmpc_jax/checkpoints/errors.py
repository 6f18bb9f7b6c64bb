"""The one error type checkpoint readers raise: names the file and the problem."""


class CheckpointError(ValueError):
    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")
