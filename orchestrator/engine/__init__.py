"""Running a plan: the executor (the only Ray code), the job, the commit, output
guards and locks."""
