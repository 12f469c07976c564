"""Analysis of measured history: distributions and trends (history), bottlenecks, capacity planning,
reports and their rendering, troubleshooting views, and the request profiler."""
