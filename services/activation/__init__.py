"""The activation service: evaluates segments and delivers them to channels through
activator plugins."""
