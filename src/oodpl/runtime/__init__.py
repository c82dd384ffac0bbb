"""What every stage shares at run time: run directories (rundir), metrics logging (runlog), processes and devices
(distributed), start-up checks and progress notes."""
