"""Domain logic, testable without HTTP. Write operations commit before they return."""
