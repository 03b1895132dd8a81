"""HTTP request and response bodies (pydantic), one family per entity."""
