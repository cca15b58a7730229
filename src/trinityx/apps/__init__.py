"""What a user runs on a trained MoCaE folder: the HTTP server (`serve`), the terminal chat (`chat`) and the
export as a merged model or PEFT adapters (`export`)."""
