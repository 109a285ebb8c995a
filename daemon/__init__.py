"""The daemon process: watches the inbox, admits files into the spool, runs one worker at a time."""
